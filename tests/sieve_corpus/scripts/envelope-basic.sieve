# RFC 5228 5.4: envelope "from" and "to"
require ["envelope", "fileinto"];
if envelope :is "from" "alice@example.com" {
    fileinto "From-Alice";
}
if envelope :domain :is "from" "lists.example.net" {
    fileinto "From-List";
}
if envelope :localpart :is "to" "postmaster" {
    fileinto "Postmaster";
}
if envelope :all :is "to" "rcpt@example.org" {
    fileinto "To-Rcpt";
}
