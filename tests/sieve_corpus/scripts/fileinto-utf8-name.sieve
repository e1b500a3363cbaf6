# RFC 5228 2.7.2 / RFC 5198: mailbox names are UTF-8
require "fileinto";
if header :contains "subject" "Grüße" {
    fileinto "Grüße";
} elsif header :contains "subject" "Café" {
    fileinto "Café.Spéciale";
} else {
    fileinto "Entwürfe";
}
