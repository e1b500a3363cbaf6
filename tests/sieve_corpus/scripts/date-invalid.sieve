# RFC 5260 4: a header that is not a valid date makes the test false
require ["date", "fileinto"];
if date :matches "x-value" "year" "*" { fileinto "ValueIsDate"; }
if date :matches "date" "year" "*" { fileinto "DateIsDate"; }
if not date :matches "x-missing" "year" "*" { fileinto "MissingIsNotDate"; }
