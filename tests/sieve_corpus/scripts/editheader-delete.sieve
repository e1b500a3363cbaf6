# RFC 5293 5: deleteheader with :index, :last and match types
require ["editheader", "fileinto", "index", "relational", "comparator-i;ascii-numeric"];
deleteheader :index 1 "x-tag";
if header :index 1 :is "x-tag" "second" { fileinto "FirstTagGone"; }
deleteheader :matches "x-tag" "th*";
if header :count "eq" :comparator "i;ascii-numeric" "x-tag" "1" { fileinto "OneTagLeft"; }
deleteheader "list-id";
if not exists "list-id" { fileinto "NoListId"; }
deleteheader :contains "subject" "meeting";
if not exists "subject" { fileinto "SubjectGone"; }
