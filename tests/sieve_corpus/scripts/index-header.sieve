# RFC 5260 6: :index and :last
require ["index", "date", "fileinto", "variables"];
if header :index 1 :contains "received" "relay3" { fileinto "FirstIsRelay3"; }
if header :index 1 :last :contains "received" "relay1" { fileinto "LastIsRelay1"; }
if header :index 2 :is "x-tag" "second" { fileinto "SecondTag"; }
if header :index 4 :matches "x-tag" "*" { fileinto "NoFourthTag"; }
if address :index 2 :is "to" "rcpt@example.org" { fileinto "SecondTo"; }
if header :index 2 :last :matches "x-tag" "*" { fileinto "Tag.${1}"; }
