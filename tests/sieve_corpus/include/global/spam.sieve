# a site-wide script: spam into Junk
require ["fileinto", "imap4flags"];
if header :is "x-spam-flag" "YES" {
    fileinto :flags "\\Seen" "Junk";
}
