# RFC 5229 3.2: match variables from :matches, ${0} the whole match
require ["variables", "fileinto"];
if header :matches "subject" "*ting*" {
    fileinto "A.${1}.${2}";
}
if address :matches :localpart "from" "?*" {
    fileinto "B.${1}.${2}";
}
if header :matches "date" "*, * * * *:*:* *" {
    fileinto "C.${2}-${3}-${4}.${8}";
}
if header :matches "subject" "*" {
    if header :matches "from" "no-match-*" {
        fileinto "never";
    }
    # a failed :matches leaves the match variables alone
    fileinto "D.${0}";
}
