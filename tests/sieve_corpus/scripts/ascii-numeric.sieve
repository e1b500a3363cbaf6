# RFC 4790 9.1.1: i;ascii-numeric compares the leading digits; no digits is +infinity
require ["relational", "comparator-i;ascii-numeric", "fileinto"];
if header :is :comparator "i;ascii-numeric" "x-count" "10" { fileinto "CountIsTen"; }
if header :is :comparator "i;ascii-numeric" "x-priority" "01" { fileinto "PriorityOne"; }
if header :value "gt" :comparator "i;ascii-numeric" "x-value" "99999" { fileinto "AbcIsInfinite"; }
if header :is :comparator "i;ascii-numeric" "x-value" "xyz" { fileinto "InfinitiesEqual"; }
if header :value "lt" :comparator "i;ascii-numeric" "x-negative" "1" { fileinto "NegativeSmall"; }
if header :value "gt" :comparator "i;ascii-numeric" "x-big" "99999999999999999999" { fileinto "BigNumber"; }
if header :is :comparator "i;ascii-numeric" "x-spaced" "42" { fileinto "SpacedIs42"; }
