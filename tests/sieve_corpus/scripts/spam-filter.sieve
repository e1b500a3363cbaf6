# A typical user script: spam, lists, then a vacation answer
require ["fileinto", "imap4flags", "vacation", "relational",
         "comparator-i;ascii-numeric", "variables", "envelope"];
if anyof (header :is "x-spam-flag" "YES",
          header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "10") {
    setflag "\\Seen";
    fileinto "Junk";
    stop;
}
if header :matches "list-id" "*<*.lists.example.net>" {
    fileinto "Lists.${2}";
    stop;
}
if envelope :is "to" "postmaster@example.org" {
    addflag "$Postmaster";
}
vacation :days 14 :subject "Away" :addresses "postmaster@example.org"
         "I am travelling and will answer after the 20th.";
