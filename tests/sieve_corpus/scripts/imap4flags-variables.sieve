# RFC 5232 3, 5 with variables: flags from header content
require ["imap4flags", "variables", "fileinto"];
if header :matches "x-spam-flag" "YES" {
    set "f" "\\Seen Junk";
    setflag "${f}";
    fileinto :flags "${f} \\Deleted" "Junk";
}
if header :matches "subject" "*" {
    addflag "subject-seen";
}
