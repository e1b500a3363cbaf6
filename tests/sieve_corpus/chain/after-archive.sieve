# a site "after" script
require ["fileinto", "copy"];
fileinto :copy "Archive";
