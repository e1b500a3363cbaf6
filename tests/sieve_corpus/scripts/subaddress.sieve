# RFC 5233 4: :user and :detail
require ["subaddress", "envelope", "fileinto", "variables"];
if envelope :detail :matches "to" "*" {
    fileinto "detail.${1}";
}
if envelope :user :is "to" "rcpt" { fileinto "user-rcpt"; }
if address :detail :is "from" "news" { fileinto "from-news"; }
if address :user :is "to" "rcpt" { fileinto "to-user-rcpt"; }
if address :detail :is "to" "" { fileinto "empty-detail"; }
if not address :detail :matches "to" "*" { fileinto "no-detail"; }
