# RFC 5490 3.2: :create
require ["fileinto", "mailbox"];
if address :is :domain "from" ["example.com", "example.net"] {
    fileinto :create "Senders.Known";
} else {
    fileinto :create "Senders.Other";
}
