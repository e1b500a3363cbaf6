# RFC 5293 4: a value that is not ASCII is added as RFC 2047 encoded words, and tests
# see it decoded; RFC 5293 5: deleteheader :index counts from the end with :last
require ["editheader", "fileinto", "index", "variables"];
addheader "X-Greeting" "Grüße aus Köln";
if header :is "x-greeting" "Grüße aus Köln" { fileinto "GreetingDecoded"; }
addheader :last "X-Tag" "fourth";
deleteheader :index 1 :last "x-tag";
if header :index 1 :last :matches "x-tag" "*" { fileinto "LastTag.${1}"; }
deleteheader :is "x-tag" "";
