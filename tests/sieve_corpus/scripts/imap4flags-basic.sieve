# RFC 5232 4, 5: setflag, addflag, removeflag and the implicit keep's flags
require ["imap4flags"];
setflag "\\Flagged";
addflag ["\\Seen", "$Work"];
if header :contains "subject" "meeting" {
    removeflag "\\Flagged";
}
if exists "list-id" {
    addflag "\\Seen \\Answered";
}
