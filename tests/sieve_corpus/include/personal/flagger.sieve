require ["imap4flags", "include", "variables"];
global "label";
addflag "${label}";
