# RFC 5322 4.3: obsolete zone names and two-digit years; RFC 5322 3.3: -0000
require ["date", "fileinto", "variables"];
if date :is :originalzone "date" "zone" "-0800" { fileinto "PstIsMinus8"; }
if date :is :zone "+0000" "date" "date" "2025-01-01" { fileinto "PstUtcNewYear"; }
if date :matches :originalzone "date" "year" "*" { fileinto "Year.${1}"; }
if date :matches :originalzone "resent-date" "zone" "*" { fileinto "ResentZone.${1}"; }
if date :matches :originalzone "resent-date" "time" "*" { fileinto "ResentTime.${1}"; }
if date :matches :originalzone "resent-date" "year" "*" { fileinto "ResentYear.${1}"; }
