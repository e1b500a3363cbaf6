# RFC 5228 2.10.3: the same fileinto twice, keep and fileinto "INBOX", store once
require "fileinto";
fileinto "Dup";
fileinto "Dup";
keep;
fileinto "INBOX";
if header :contains "subject" "meeting" {
    fileinto "inbox";
}
