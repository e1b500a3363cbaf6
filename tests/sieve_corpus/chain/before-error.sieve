# a run-time error in a "before" script
require ["include"];
include :personal "does-not-exist";
