# RFC 5231 4.1: :value with i;ascii-casemap (the default) and i;ascii-numeric
require ["relational", "comparator-i;ascii-numeric", "fileinto"];
if header :value "gt" "subject" "M" { fileinto "SubjectAfterM"; }
if header :value "lt" :comparator "i;ascii-casemap" "subject" "n" { fileinto "SubjectBeforeN"; }
if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "10" { fileinto "Spam10"; }
if header :value "lt" :comparator "i;ascii-numeric" "x-spam-score" "10" { fileinto "SpamUnder10"; }
if header :value "ne" :comparator "i;octet" "x-tag" "second" { fileinto "SomeTagNotSecond"; }
if address :value "le" :all "from" "b" { fileinto "FromBeforeB"; }
