# RFC 5228 8.1, 2.4.2: identifiers in any case, comments anywhere, escapes in strings,
# numbers with quantifiers
REQUIRE ["fileinto", "variables"];
/* a bracket comment
   over two lines */ IF /* inside */ Header :Contains "Subject" "meeting" # trailing
{ FileInto "A"; }
set "q" "a \"quoted\" \\ back\slash";
if string :is "${q}" "a \"quoted\" \\ backslash" { fileinto "Escapes"; }
if size :over 0K { fileinto "SizeK"; }
if SIZE :UNDER 1m { fileinto "UnderOneM"; }
