# RFC 5228 5.4 with :matches and match variables (RFC 5229 3.2)
require ["envelope", "fileinto", "variables"];
if envelope :matches "from" "*@*" {
    fileinto "env.${2}";
}
if envelope :comparator "i;octet" :matches "from" "MAILER-DAEMON@*" {
    fileinto "daemon";
}
