# RFC 5230 4.7: vacation goes with keep, fileinto, redirect and discard
require ["vacation", "fileinto", "imap4flags"];
if header :contains "subject" "sale" {
    discard;
} elsif exists "list-id" {
    fileinto "Lists";
} else {
    addflag "\\Flagged";
}
vacation :days 5 "Noted.";
