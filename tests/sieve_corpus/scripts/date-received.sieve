# RFC 5260 4: the date test on Received takes the date after the last ";"
require ["date", "index", "fileinto", "relational"];
if date :is :zone "+0000" "received" "date" "2024-03-12" { fileinto "ReceivedDate"; }
if date :index 3 :is :zone "+0000" "received" "second" "01" { fileinto "ThirdReceivedSecond"; }
if date :index 1 :last :is :originalzone "received" "hour" "10" { fileinto "LastReceivedHour"; }
if date :value "gt" :zone "+0000" "received" "iso8601" "2024-03-20T00:00:00Z" { fileinto "ReceivedAfter20th"; }
