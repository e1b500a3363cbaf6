# a site "before" script that only sets a flag and keeps
require ["imap4flags"];
addflag "$Checked";
