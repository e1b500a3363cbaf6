# RFC 5293 4, 6: an added header is seen by later tests
require ["editheader", "fileinto", "index"];
addheader "X-Sieve-Seen" "yes";
addheader :last "X-Sieve-Seen" "last";
if header :index 1 :is "x-sieve-seen" "yes" { fileinto "AddedFirst"; }
if header :index 1 :last :is "x-sieve-seen" "last" { fileinto "AddedLast"; }
addheader "Subject" "second subject";
if header :index 1 :is "subject" "second subject" { fileinto "NewSubjectFirst"; }
