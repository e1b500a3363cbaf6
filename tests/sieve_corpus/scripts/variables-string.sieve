# RFC 5229 5: the string test; unknown variables are empty
require ["variables", "fileinto", "relational", "comparator-i;ascii-numeric"];
set "empty" "";
if string :is "${undefined}" "" { fileinto "UndefinedEmpty"; }
if string :is "${empty}" "" { fileinto "SetEmpty"; }
if header :matches "x-spam-score" "*" {
    set "score" "${1}";
}
if string :value "ge" :comparator "i;ascii-numeric" "${score}" "5" { fileinto "HighScore"; }
if string :count "eq" :comparator "i;ascii-numeric" ["a", "", "b"] "2" { fileinto "CountSkipsEmpty"; }
if string :matches "${score}" "" { fileinto "NoScore"; }
