require ["fileinto", "include", "variables"];
global "count";
set "count" "${count}x";
fileinto "Once.${count}";
