# RFC 5228 4.1: fileinto cancels the implicit keep
require "fileinto";
if header :contains "subject" "meeting" {
    fileinto "Work";
} elsif address :domain :is "from" "lists.example.net" {
    fileinto "Lists";
} elsif header :contains "list-id" "dev.lists.example.net" {
    fileinto "Lists.Dev";
}
