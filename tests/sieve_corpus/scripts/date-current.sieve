# RFC 5260 5: currentdate (only what does not change between two runs)
require ["date", "relational", "fileinto", "variables"];
if currentdate :value "ge" "year" "2020" { fileinto "After2020"; }
if currentdate :value "lt" "year" "1990" { fileinto "Before1990"; }
if currentdate :zone "+0000" :matches "julian" "*" { fileinto "HasJulian"; }
if date :value "lt" :zone "+0000" "date" "date" "2023-01-01" { fileinto "OldMail"; }
