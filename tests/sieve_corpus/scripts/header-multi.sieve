# RFC 5228 5.7: lists of names and keys; names are case-insensitive
require "fileinto";
if header :contains ["X-Nonexistent", "SUBJECT"] ["nothing", "Release"] { fileinto "ListMatch"; }
if header :is "subject" "a subject that is folded over	two lines" { fileinto "Unfolded"; }
if header :is "subject" "a subject that is folded over two lines" { fileinto "UnfoldedSpace"; }
if header :is "x-trailing" "value with trailing spaces" { fileinto "TrailingTrimmed"; }
if header :is "x-trailing" "value with trailing spaces   " { fileinto "TrailingKept"; }
if header :is "x-empty" "" { fileinto "EmptyHeader"; }
if header :contains "keywords" "beta" { fileinto "Keywords"; }
