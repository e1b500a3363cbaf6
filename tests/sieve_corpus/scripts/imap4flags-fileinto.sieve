# RFC 5232 5: :flags on fileinto and keep replaces the internal variable for that action
require ["imap4flags", "fileinto"];
addflag "\\Seen";
if exists "list-id" {
    fileinto :flags ["\\Flagged", "listmail"] "Lists";
}
fileinto "Everything";
keep :flags "";
