# RFC 5228 2.7.3: i;ascii-casemap (default) versus i;octet
require "fileinto";
if header :is "subject" "MEETING TOMORROW AT 10" { fileinto "CasemapIs"; }
if header :is :comparator "i;octet" "subject" "MEETING TOMORROW AT 10" { fileinto "OctetIs"; }
if header :contains :comparator "i;octet" "subject" "Meeting" { fileinto "OctetContains"; }
if header :contains "subject" "CAFÉ" { fileinto "NonAsciiNotFolded"; }
if header :contains "subject" "café" { fileinto "NonAsciiSame"; }
if header :matches :comparator "i;ascii-casemap" "subject" "*sale*" { fileinto "CasemapMatches"; }
