# RFC 5228 2.7.2: encoded words (RFC 2047) are decoded before comparison
require "fileinto";
if header :contains "subject" "Grüße aus Köln" { fileinto "Decoded"; }
if header :contains "subject" "=?UTF-8?" { fileinto "NotDecoded"; }
if header :is "subject" "Invoice n° 4711 is due" { fileinto "AdjacentWords"; }
if header :contains "x-note" "café crème and more" { fileinto "Latin1Word"; }
if address :is :localpart "from" "dieter" { fileinto "AddressLocalpart"; }
if header :contains "from" "Jürgen Müller" { fileinto "DisplayName"; }
if header :contains "comments" "plain words" { fileinto "Comments"; }
if header :contains "subject" "☕" { fileinto "RawUtf8"; }
