# RFC 5229 3: names are case-insensitive, ${...} that is not a reference stays as written
require ["variables", "fileinto"];
set "Folder" "Target";
set "n1" "x";
set "n1" "${n1}${n1}";
fileinto "${folder}.${FOLDER}.${n1}";
fileinto "${bad-name}.${1x}.$${n1}.${}";
