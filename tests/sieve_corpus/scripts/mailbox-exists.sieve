# RFC 5490 3.1: mailboxexists; INBOX always exists
require ["fileinto", "mailbox"];
if mailboxexists "INBOX" {
    fileinto "INBOX-exists";
}
if mailboxexists ["INBOX", "No.Such.Folder"] {
    fileinto "Both-exist";
}
if not mailboxexists "No.Such.Folder" {
    fileinto :create "Created";
}
