# RFC 5230 4.3, 4.4: :subject and :from
require ["vacation", "variables"];
if header :matches "subject" "*" { set "s" "${1}"; }
vacation :subject "Re: ${s} (away)" :from "Recipient <rcpt@example.org>"
         "Your mail about ${s} will be read next week.";
