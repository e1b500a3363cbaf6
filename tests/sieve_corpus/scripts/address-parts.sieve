# RFC 5228 5.1, 2.7.4: address parts of groups, comments, quoted local parts
require ["fileinto", "variables"];
if address :is :all "cc" "nina@example.net" { fileinto "GroupMember"; }
if address :is :domain "cc" "EXAMPLE.ORG" { fileinto "CcDomainCase"; }
if address :is :localpart "from" "lena" { fileinto "CommentedFrom"; }
if address :matches :all "reply-to" "*@example.com" { fileinto "QuotedLocal.${1}"; }
if address :is :localpart "sender" "lena" { fileinto "SenderNoDomain"; }
if address :contains "to" "undisclosed" { fileinto "GroupName"; }
if address :is "to" "rcpt@example.org" { fileinto "ToRcpt"; }
if address :all :comparator "i;octet" :is "cc" "RCPT@EXAMPLE.ORG" { fileinto "OctetUpper"; }
