# RFC 5260 4: the date test with :zone and :originalzone
require ["date", "relational", "fileinto"];
if date :is :originalzone "date" "year" "2024" { fileinto "Year2024"; }
if date :is :zone "+0000" "date" "year" "2025" { fileinto "UtcYear2025"; }
if date :is :zone "+0100" "date" "date" "2025-01-01" { fileinto "CetNewYear"; }
if date :is :originalzone "date" "zone" "-0800" { fileinto "PacificZone"; }
if date :value "ge" :originalzone "date" "hour" "23" { fileinto "LateHour"; }
if date :is :zone "+0000" "date" "weekday" "3" { fileinto "Wednesday"; }
if date :is :originalzone "date" "iso8601" "2024-12-31T23:30:45-08:00" { fileinto "Iso8601"; }
if date :is :zone "-0500" "date" "std11" "Thu, 14 Mar 2024 08:00:00 -0500" { fileinto "Std11"; }
if date :is :zone "+0000" "resent-date" "time" "07:00:00" { fileinto "ResentTime"; }
