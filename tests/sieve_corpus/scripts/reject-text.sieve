# RFC 5429 2.2 with a multi-line reason (RFC 5228 2.4.2 text:)
require ["reject", "variables"];
if header :matches "subject" "*" {
    set "subj" "${1}";
}
if not header :contains "from" "alice" {
    reject text:
I do not accept mail from you.
Subject was: ${subj}
.
;
}
