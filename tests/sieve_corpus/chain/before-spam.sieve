# a site "before" script: spam is filed, which ends the chain (Pigeonhole sieve_before)
require ["fileinto"];
if header :is "x-spam-flag" "YES" {
    fileinto "Junk";
}
