# RFC 5232 3: flag strings with several names, repeated and empty ones
require ["imap4flags", "fileinto"];
setflag "  \\seen   \\SEEN  $Label1 ";
addflag ["$label1", "", "$Label2"];
removeflag "$LABEL2";
fileinto "Flagged";
if hasflag :is "\\Seen" { fileinto :flags "\\Answered" "HasSeen"; }
