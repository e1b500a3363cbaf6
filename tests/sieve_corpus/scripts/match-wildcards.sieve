# RFC 5228 2.7.1: :matches "*" and "?", escaped wildcards, :contains ""
require "fileinto";
if header :matches "subject" "*" { fileinto "Any"; }
if header :matches "subject" "" { fileinto "EmptyOnly"; }
if header :contains "subject" "" { fileinto "ContainsEmpty"; }
if header :matches "subject" "????????" { fileinto "EightChars"; }
if header :matches "subject" "Caf? *" { fileinto "CafQuestion"; }
if header :matches "x-star" "a\\*b\\?c\\\\d" { fileinto "EscapedLiteral"; }
if header :matches "x-star" "a*b*c*d" { fileinto "StarsInValue"; }
if header :matches "subject" "*[dev]*" { fileinto "BracketsAreLiteral"; }
