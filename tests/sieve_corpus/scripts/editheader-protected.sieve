# RFC 5293 7: Received and Auto-Submitted are not to be changed
require ["editheader", "fileinto", "relational", "comparator-i;ascii-numeric"];
deleteheader "received";
deleteheader "auto-submitted";
if exists "received" { fileinto "ReceivedStays"; }
if exists "auto-submitted" { fileinto "AutoSubmittedStays"; }
addheader "Received" "from nowhere";
if header :count "ge" :comparator "i;ascii-numeric" "received" "4" { fileinto "ReceivedAdded"; }
