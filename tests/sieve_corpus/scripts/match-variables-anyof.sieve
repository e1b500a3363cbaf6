# RFC 5229 3.2: match variables come from the last :matches that matched
require ["variables", "fileinto"];
if anyof (header :matches "x-nonexistent" "*",
          header :matches "from" "*<*@*>*",
          header :matches "subject" "*") {
    fileinto "M.${2}.${3}";
}
if allof (header :matches "subject" "*", header :matches "to" "*@*") {
    fileinto "N.${2}";
}
