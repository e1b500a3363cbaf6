# RFC 6609 3.3: global variables shared with an included script
require ["include", "variables", "imap4flags"];
global "label";
if header :contains "subject" "meeting" {
    set "label" "$Meeting";
} else {
    set "label" "$Other";
}
include :personal "flagger";
include :personal "nested";
