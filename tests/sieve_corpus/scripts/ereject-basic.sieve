# RFC 5429 2.1: ereject
require "ereject";
if address :domain :is "from" "shop.example.com" {
    ereject "Refused at the door.";
}
