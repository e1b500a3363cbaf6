# RFC 5230 4.2: :handle
require ["vacation", "variables"];
if address :matches :domain "from" "*" {
    vacation :handle "away-${1}" :days 2 "Domain-specific answer.";
}
