# RFC 5232 4, 6: hasflag on the internal variable and on a variable
require ["imap4flags", "fileinto", "variables", "relational", "comparator-i;ascii-numeric"];
set "mine" "";
addflag "mine" ["$a", "$b"];
addflag ["\\Draft", "Important"];
if hasflag :is "important" { fileinto "HasImportant"; }
if hasflag :count "eq" :comparator "i;ascii-numeric" "2" { fileinto "TwoFlags"; }
if hasflag :is "mine" "$b" { fileinto "MineHasB"; }
if hasflag :matches "mine" "$*" { fileinto "MineHasDollar"; }
removeflag "mine" "$a";
if hasflag :count "eq" :comparator "i;ascii-numeric" "mine" "1" { fileinto "MineOne"; }
