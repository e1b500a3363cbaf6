# RFC 5228 4.4: discard cancels only the implicit keep
require ["fileinto", "imap4flags"];
discard;
if header :contains "subject" "report" {
    fileinto :flags "\\Seen" "Reports";
}
if exists "list-id" {
    keep;
}
