# RFC 5228 3.1, 5.2, 5.3, 5.8: if/elsif/else, allof, anyof, not
require "fileinto";
if allof (exists "from", not exists "x-nonexistent",
          anyof (header :contains "subject" "report", header :contains "subject" "meeting",
                 not true)) {
    fileinto "A";
} elsif anyof (false, allof (true, exists ["to", "cc"])) {
    fileinto "B";
} else {
    fileinto "C";
}
