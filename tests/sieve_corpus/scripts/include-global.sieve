# RFC 6609 3.2: include :global
require ["include"];
include :global "spam";
include :global "common";
