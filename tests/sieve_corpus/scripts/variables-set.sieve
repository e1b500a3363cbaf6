# RFC 5229 4: set with modifiers, in order of precedence
require ["variables", "fileinto"];
set "name" "Mixed Case";
set :lower "lower" "${name}";
set :upper "upper" "${name}";
set :lowerfirst "lf" "ABC";
set :upperfirst "uf" "abc";
set :upper :lowerfirst "ulf" "abc";
set :length "len" "${name}";
set :quotewildcard "qw" "a*b?c\\d";
set :length :lower "lenlower" "ABCDE";
fileinto "${lower}-${upper}-${lf}-${uf}-${ulf}-${len}-${lenlower}";
if string :is "${qw}" "a\\*b\\?c\\\\d" { fileinto "QuoteWildcardOK"; }
