# RFC 5231 4.2: :count over header and address values
require ["relational", "comparator-i;ascii-numeric", "fileinto"];
if header :count "ge" :comparator "i;ascii-numeric" "received" "3" { fileinto "ThreeHops"; }
if address :count "gt" :comparator "i;ascii-numeric" ["to", "cc"] "2" { fileinto "ManyRecipients"; }
if header :count "eq" :comparator "i;ascii-numeric" "x-tag" "3" { fileinto "ThreeTags"; }
if header :count "eq" :comparator "i;ascii-numeric" "x-missing" "0" { fileinto "NoneMissing"; }
if address :count "eq" :comparator "i;ascii-numeric" "to" "1" { fileinto "OneTo"; }
