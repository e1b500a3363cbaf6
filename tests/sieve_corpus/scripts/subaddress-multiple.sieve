# RFC 5233 4: the detail is everything after the first separator
require ["subaddress", "fileinto", "variables"];
if address :detail :matches "cc" "*" { fileinto "CcDetail.${1}"; }
if address :user :matches "cc" "*" { fileinto "CcUser.${1}"; }
if address :detail :is "cc" "" { fileinto "CcEmptyDetail"; }
