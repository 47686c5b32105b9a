/* Maps the file argv[1] and reads one byte of every page, so its pages fill the guest's
 * page cache (each fault maps the pages around it too: few faults, no copies), then
 * prints the sum of the bytes read. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return 1;
    unsigned char *p = mmap(0, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return 1;
    unsigned long sum = 0;
    for (off_t i = 0; i < st.st_size; i += 4096) sum += p[i];
    printf("%lu\n", sum);
    return 0;
}
